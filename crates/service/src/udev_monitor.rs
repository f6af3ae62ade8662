//! A udev monitor on the tokio runtime, for the services that react to
//! devices (the drive watcher: block devices; the LED: a replugged
//! BlinkStick). Woken by the kernel's netlink socket, never polled.

use tokio::io::unix::AsyncFd;

/// udev's event stream for one subsystem.
pub struct UdevMonitor {
    socket: AsyncFd<udev::MonitorSocket>,
}

impl UdevMonitor {
    /// Listens to `subsystem` ("block", "hidraw"). Open the monitor before
    /// enumerating what is already there, so nothing falls between the two.
    pub fn listen(subsystem: &str) -> std::io::Result<UdevMonitor> {
        let socket = udev::MonitorBuilder::new()?
            .match_subsystem(subsystem)?
            .listen()?;
        // SAFETY: the monitor socket owns its descriptor; it stays open and
        // the same for as long as the AsyncFd owns the monitor.
        let socket =
            unsafe { AsyncFd::register_with_interest(socket, tokio::io::Interest::READABLE) }?;
        Ok(UdevMonitor { socket })
    }

    /// Waits for the next events and returns every one that is ready (at
    /// least one, unless a spurious wake-up delivered none).
    pub async fn next_events(&mut self) -> std::io::Result<Vec<udev::Event>> {
        let mut guard = self.socket.readable_mut().await?;
        let events: Vec<udev::Event> = guard.get_inner().iter().collect();
        guard.clear_ready();
        Ok(events)
    }
}
