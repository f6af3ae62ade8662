//! Clean shutdown on SIGTERM (systemd stop) and SIGINT (Ctrl-C).

use std::future::Future;
use std::pin::Pin;

/// A future that resolves when the service should stop.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Resolves on the first SIGTERM or SIGINT and tells systemd we are stopping.
pub fn shutdown_signal() -> Shutdown {
    Box::pin(async {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM: stopping"),
                    _ = int.recv() => tracing::info!("SIGINT: stopping"),
                }
            }
            _ => {
                tracing::error!("cannot install signal handlers; stop with SIGKILL");
                std::future::pending::<()>().await;
            }
        }
        crate::notify::stopping();
    })
}
