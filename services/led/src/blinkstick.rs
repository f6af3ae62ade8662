//! BlinkStick USB LED: report layouts and the hidapi device.
//!
//! # Protocol
//!
//! A BlinkStick (USB `20a0:41e5`) is a HID device that is driven with HID
//! *feature reports* (a `SET_REPORT` control transfer). The layouts below come
//! from the official Python library, `arvydas/blinkstick-python`,
//! `BlinkStick.set_color` (`blinkstick/blinkstick.py`, and in the 2.x tree
//! `src/blinkstick/clients/blinkstick.py`):
//!
//! ```text
//! if index == 0 and channel == 0:
//!     control_string = bytes(bytearray([0, r, g, b]));              report_id = 1
//! else:
//!     control_string = bytes(bytearray([5, channel, index, r, g, b])); report_id = 5
//! backend.control_transfer(0x20, 0x9, report_id, 0, control_string)
//! ```
//!
//! i.e. `bmRequestType 0x20` (class, host-to-device), `bRequest 0x09`
//! (`SET_REPORT`), `wValue` = report id, and a buffer whose first byte is the
//! report-id slot (the Windows backend overwrites it with `wValue`).
//!
//! hidapi's `hid_send_feature_report` / [`hidapi::HidDevice::send_feature_report`]
//! wants exactly that buffer: "The first byte of `data` must contain the
//! 'Report ID' ... followed by the report data". So the bytes written are:
//!
//! | report | bytes                          | meaning                                   |
//! |--------|--------------------------------|-------------------------------------------|
//! | 1      | `[1, r, g, b]`                 | the single LED (original BlinkStick; LED 0 elsewhere) |
//! | 5      | `[5, channel, index, r, g, b]` | one LED of a Pro/Strip/Square/Nano/Flex   |
//!
//! Reports 6/7/8/9 (`set_led_data`: `[id, channel, g0, r0, b0, g1, ...]`,
//! 8/16/32/64 LEDs, GRB order) set a whole frame; ferry does not need them.
//! `channel` is the output pin of a BlinkStick Pro (0 = R, 1 = G, 2 = B); all
//! other multi-LED sticks use channel 0 and `index` selects the LED.
//!
//! One deliberate difference: blinkstick-python sends report 1 when
//! `index == 0 && channel == 0`; here an explicit index always uses report 5
//! and only "no index" ([`None`]) uses report 1.
//!
//! # Brightness limit
//!
//! `blinkstick --limit P` (alias `--brightness`, `bin/blinkstick`) does
//! `stick.set_max_rgb_value(int(float(P) / 100.0 * 255))`, and `set_color`
//! remaps every component with `int((value / 255.0) * max_value)`
//! (`RGBColor.remap_to_new_range`, formerly `_remap_color`), max clamped to
//! 0..=255. Both truncate toward zero and are evaluated in IEEE doubles;
//! [`apply_limit`] does the same arithmetic in `f64`, so it matches the Python
//! tool bit for bit, including the few cases where the float product lands just
//! below an integer (e.g. limit 20, value 155 gives 30, not 31).

use std::ffi::CString;
use std::fmt;

use hidapi::{HidApi, HidDevice};

/// USB vendor id of every BlinkStick (Agile Innovative, V-USB shared id).
pub const VENDOR_ID: u16 = 0x20a0;
/// USB product id of every BlinkStick.
pub const PRODUCT_ID: u16 = 0x41e5;
/// Feature report 1: colour of the (first) LED, `[1, r, g, b]`.
pub const REPORT_RGB: u8 = 1;
/// Feature report 5: colour of one LED by channel and index,
/// `[5, channel, index, r, g, b]`.
pub const REPORT_INDEXED: u8 = 5;

/// The colour type of ferry.toml, one byte per component.
pub use ferry_config::Color as Rgb;

/// The maximum component value for a brightness limit in percent, as
/// `bin/blinkstick` computes it: `int(float(limit) / 100.0 * 255)`, clamped to
/// 0..=255 (so anything above 100 % is full brightness).
pub fn max_rgb_value(brightness_limit_percent: u8) -> u8 {
    let max = (f64::from(brightness_limit_percent) / 100.0 * 255.0).trunc();
    max.clamp(0.0, 255.0) as u8
}

/// Scales a colour to a brightness limit in percent, exactly like
/// blinkstick-python's `remap_to_new_range`: each component becomes
/// `int((value / 255.0) * max_rgb_value(limit))`.
pub fn apply_limit(color: Rgb, brightness_limit_percent: u8) -> Rgb {
    let max = f64::from(max_rgb_value(brightness_limit_percent));
    // Truncation toward zero like Python's int(); the result is in 0..=max.
    let remap = |v: u8| ((f64::from(v) / 255.0) * max).trunc().clamp(0.0, 255.0) as u8;
    Rgb {
        r: remap(color.r),
        g: remap(color.g),
        b: remap(color.b),
    }
}

/// The exact buffer passed to hidapi's `send_feature_report` (report id first)
/// to show `color` at `brightness_limit_percent`:
///
/// * `index == None` → report 1: `[1, r, g, b]` (`channel` is not used);
/// * `index == Some(i)` → report 5: `[5, channel, i, r, g, b]`.
///
/// Source: blinkstick-python `BlinkStick.set_color` (see the module docs).
pub fn feature_report(
    color: Rgb,
    index: Option<u8>,
    channel: u8,
    brightness_limit_percent: u8,
) -> Vec<u8> {
    let Rgb { r, g, b } = apply_limit(color, brightness_limit_percent);
    match index {
        None => vec![REPORT_RGB, r, g, b],
        Some(i) => vec![REPORT_INDEXED, channel, i, r, g, b],
    }
}

/// What went wrong talking to the stick.
#[derive(Debug, thiserror::Error)]
pub enum BlinkStickError {
    /// No matching stick is plugged in, or it could not be opened (the reason
    /// is logged).
    #[error(
        "no BlinkStick (20a0:41e5) found; plug it in or check the udev rule granting hidraw access"
    )]
    NotFound,
    /// Writing the feature report failed (the stick was probably unplugged).
    #[error("writing to the BlinkStick failed: {0}")]
    Write(#[source] std::io::Error),
}

/// Something a feature report can be written to: the opened hidapi device, or
/// a recording fake in tests.
trait ReportSink {
    fn send_feature_report(&self, data: &[u8]) -> std::io::Result<()>;
}

impl ReportSink for HidDevice {
    fn send_feature_report(&self, data: &[u8]) -> std::io::Result<()> {
        HidDevice::send_feature_report(self, data).map_err(std::io::Error::other)
    }
}

fn write_report(dev: &impl ReportSink, bytes: &[u8]) -> Result<(), BlinkStickError> {
    dev.send_feature_report(bytes)
        .map_err(BlinkStickError::Write)
}

/// The device-handling policy of [`BlinkStick::set`], independent of hidapi:
/// open when nothing is open; on a write error drop the handle; if that handle
/// was an old one (the stick may have been replugged), reopen and retry once,
/// as blinkstick-python's `_refresh_device` does. After an error the slot is
/// empty, so the next call opens the device again.
fn set_via<S: ReportSink>(
    slot: &mut Option<S>,
    mut open: impl FnMut() -> Result<S, BlinkStickError>,
    bytes: &[u8],
) -> Result<(), BlinkStickError> {
    let fresh = slot.is_none();
    let dev = match slot.take() {
        Some(dev) => dev,
        None => open()?,
    };
    match write_report(&dev, bytes) {
        Ok(()) => {
            *slot = Some(dev);
            Ok(())
        }
        Err(e) if fresh => Err(e),
        Err(_) => {
            drop(dev);
            let dev = open()?;
            write_report(&dev, bytes)?;
            *slot = Some(dev);
            Ok(())
        }
    }
}

/// Finds the stick (by serial when configured, else the first by hidraw path)
/// in a freshly enumerated device list and opens it.
fn open_device(
    api: &mut Option<HidApi>,
    serial: Option<&str>,
) -> Result<HidDevice, BlinkStickError> {
    if api.is_none() {
        match HidApi::new() {
            Ok(a) => *api = Some(a),
            Err(e) => {
                tracing::warn!("cannot initialise hidapi: {e}");
                return Err(BlinkStickError::NotFound);
            }
        }
    }
    let Some(api) = api.as_mut() else {
        return Err(BlinkStickError::NotFound);
    };
    // Same as HidApi::refresh_devices, but only enumerates BlinkSticks.
    let enumerated = api
        .reset_devices()
        .and_then(|()| api.add_devices(VENDOR_ID, PRODUCT_ID));
    if let Err(e) = enumerated {
        tracing::warn!("cannot enumerate HID devices: {e}");
        return Err(BlinkStickError::NotFound);
    }
    let mut candidates: Vec<(CString, Option<String>)> = api
        .device_list()
        .filter(|d| d.vendor_id() == VENDOR_ID && d.product_id() == PRODUCT_ID)
        .filter(|d| serial.is_none_or(|want| d.serial_number() == Some(want)))
        .map(|d| (d.path().to_owned(), d.serial_number().map(str::to_owned)))
        .collect();
    candidates.sort();
    candidates.dedup_by(|a, b| a.0 == b.0);
    let Some((path, found_serial)) = candidates.into_iter().next() else {
        return Err(BlinkStickError::NotFound);
    };
    match api.open_path(&path) {
        Ok(dev) => {
            tracing::debug!(
                "opened BlinkStick {} at {}",
                found_serial.as_deref().unwrap_or("(no serial)"),
                path.to_string_lossy()
            );
            Ok(dev)
        }
        Err(e) => {
            tracing::warn!(
                "BlinkStick at {} cannot be opened: {e}",
                path.to_string_lossy()
            );
            Err(BlinkStickError::NotFound)
        }
    }
}

/// One BlinkStick LED, opened lazily through hidapi (hidraw) and reopened
/// after it has been unplugged and plugged in again.
pub struct BlinkStick {
    api: Option<HidApi>,
    device: Option<HidDevice>,
    serial: Option<String>,
    index: Option<u8>,
    channel: u8,
    limit: u8,
}

impl BlinkStick {
    /// `serial` picks one stick of several (e.g. `BS012345-3.1`; `None`: the
    /// first found), `index`/`channel` the LED (`None`: report 1, see
    /// [`feature_report`]), `limit` the brightness limit in percent (like
    /// `blinkstick --limit`). Never fails: when hidapi cannot be initialised or
    /// no stick is plugged in, the stick is simply absent until a later
    /// [`set`](Self::set) finds it.
    pub fn new(serial: Option<String>, index: Option<u8>, channel: u8, limit: u8) -> Self {
        let serial = serial
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty());
        let mut api = match HidApi::new() {
            Ok(api) => Some(api),
            Err(e) => {
                tracing::warn!("cannot initialise hidapi: {e}");
                None
            }
        };
        let device = if api.is_some() {
            open_device(&mut api, serial.as_deref()).ok()
        } else {
            None
        };
        BlinkStick {
            api,
            device,
            serial,
            index,
            channel,
            limit,
        }
    }

    /// Shows `color` (scaled by the brightness limit). Opens the stick if it is
    /// not open; on a write error the handle is dropped (and, if it was an old
    /// handle, the stick is reopened and the write retried once), so a
    /// replugged stick is picked up again.
    pub fn set(&mut self, color: Rgb) -> Result<(), BlinkStickError> {
        let bytes = feature_report(color, self.index, self.channel, self.limit);
        let api = &mut self.api;
        let serial = self.serial.as_deref();
        set_via(&mut self.device, || open_device(api, serial), &bytes)
    }

    /// Whether a stick is currently open (found at construction or by the last
    /// [`set`](Self::set), and not failed since).
    pub fn present(&self) -> bool {
        self.device.is_some()
    }

    /// The bytes [`set`](Self::set) would write for `color`.
    pub fn report_for(&self, color: Rgb) -> Vec<u8> {
        feature_report(color, self.index, self.channel, self.limit)
    }
}

impl fmt::Debug for BlinkStick {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlinkStick")
            .field("hidapi", &self.api.is_some())
            .field("present", &self.device.is_some())
            .field("serial", &self.serial)
            .field("index", &self.index)
            .field("channel", &self.channel)
            .field("limit", &self.limit)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};
    use std::rc::Rc;

    // ---- brightness limit ---------------------------------------------------
    // Expected values computed with blinkstick-python's formulas:
    //   max = int(float(limit) / 100.0 * 255)        (bin/blinkstick)
    //   out = int((value / 255.0) * max)             (RGBColor.remap_to_new_range)

    #[test]
    fn max_rgb_value_matches_cli() {
        assert_eq!(max_rgb_value(0), 0);
        assert_eq!(max_rgb_value(1), 2);
        assert_eq!(max_rgb_value(10), 25);
        assert_eq!(max_rgb_value(50), 127);
        assert_eq!(max_rgb_value(99), 252);
        assert_eq!(max_rgb_value(100), 255);
        assert_eq!(max_rgb_value(101), 255);
        assert_eq!(max_rgb_value(255), 255);
    }

    #[test]
    fn limit_edge_cases() {
        let c = |v| Rgb::new(v, v, v);
        // limit 0: everything dark.
        for v in [0, 1, 128, 254, 255] {
            assert_eq!(apply_limit(c(v), 0), Rgb::OFF);
        }
        // limit 100 (and above): unchanged.
        for v in 0..=255u8 {
            assert_eq!(apply_limit(c(v), 100), c(v));
            assert_eq!(apply_limit(c(v), 255), c(v));
        }
        // limit 10 (max 25): 0 -> 0, 255 -> 25, 128 -> 12, 254 -> 24.
        assert_eq!(apply_limit(Rgb::new(0, 255, 128), 10), Rgb::new(0, 25, 12));
        assert_eq!(apply_limit(c(254), 10), c(24));
        // limit 1 (max 2): [0, 1, 128, 254, 255] -> [0, 0, 1, 1, 2].
        assert_eq!(apply_limit(Rgb::new(1, 128, 255), 1), Rgb::new(0, 1, 2));
        // limit 50 (max 127): 255 -> 127, 128 -> 63.
        assert_eq!(apply_limit(Rgb::new(255, 128, 0), 50), Rgb::new(127, 63, 0));
        // Float truncation as in Python: 155/255*51 = 30.999..., int() -> 30
        // (exact integer arithmetic would give 31).
        // All nine (limit 0..=100, value) pairs where that happens:
        for (limit, v, want) in [
            (20, 155, 30),
            (40, 155, 61),
            (59, 187, 109),
            (60, 155, 92),
            (60, 195, 116),
            (65, 187, 120),
            (67, 147, 97),
            (67, 171, 113),
            (80, 155, 123),
        ] {
            assert_eq!(apply_limit(c(v), limit), c(want), "limit {limit} value {v}");
        }
    }

    #[test]
    fn limit_matches_python_for_every_input() {
        // FNV-1a 64 over int((v / 255.0) * max(0, min(int(l / 100.0 * 255), 255)))
        // for l in 0..=255, v in 0..=255, computed with CPython 3.
        let mut h: u64 = 0xcbf29ce484222325;
        for l in 0..=255u8 {
            for v in 0..=255u8 {
                h ^= u64::from(apply_limit(Rgb::new(v, 0, 0), l).r);
                h = h.wrapping_mul(0x100000001b3);
            }
        }
        assert_eq!(h, 0x8656b69a5e1703ef);
    }

    // ---- report bytes -------------------------------------------------------
    // Layouts from blinkstick-python BlinkStick.set_color:
    //   report 1: bytearray([0, r, g, b]) with wValue = 1 → hidapi [1, r, g, b]
    //   report 5: bytearray([5, channel, index, r, g, b]) with wValue = 5

    #[test]
    fn seed_command_bytes() {
        // blinkstick --index 1 --limit 10 --set-color 33c280 (channel 0):
        // max 25; 0x33=51 -> 5, 0xc2=194 -> 19, 0x80=128 -> 12.
        let c = Rgb::parse("33c280").unwrap();
        assert_eq!(feature_report(c, Some(1), 0, 10), vec![5, 0, 1, 5, 19, 12]);
    }

    #[test]
    fn report_1_full_brightness() {
        let c = Rgb::new(0x33, 0xc2, 0x80);
        assert_eq!(feature_report(c, None, 0, 100), vec![1, 0x33, 0xc2, 0x80]);
        // channel is not part of report 1
        assert_eq!(feature_report(c, None, 2, 100), vec![1, 0x33, 0xc2, 0x80]);
        assert_eq!(feature_report(c, None, 0, 10), vec![1, 5, 19, 12]);
    }

    #[test]
    fn report_5_channel_index_variants() {
        let red = Rgb::new(255, 0, 0);
        assert_eq!(
            feature_report(red, Some(0), 0, 100),
            vec![5, 0, 0, 255, 0, 0]
        );
        assert_eq!(
            feature_report(red, Some(7), 0, 100),
            vec![5, 0, 7, 255, 0, 0]
        );
        // BlinkStick Pro: channel 2 = B output, LED 63
        assert_eq!(
            feature_report(red, Some(63), 2, 100),
            vec![5, 2, 63, 255, 0, 0]
        );
        assert_eq!(
            feature_report(Rgb::new(1, 2, 3), Some(3), 1, 100),
            vec![5, 1, 3, 1, 2, 3]
        );
    }

    #[test]
    fn off_bytes() {
        assert_eq!(feature_report(Rgb::OFF, None, 0, 100), vec![1, 0, 0, 0]);
        assert_eq!(
            feature_report(Rgb::OFF, Some(1), 0, 10),
            vec![5, 0, 1, 0, 0, 0]
        );
        assert_eq!(
            feature_report(Rgb::OFF, Some(1), 0, 0),
            vec![5, 0, 1, 0, 0, 0]
        );
    }

    // ---- write path with a fake device -------------------------------------

    /// Writes as (id of the fake device, bytes).
    type Writes = Vec<(u32, Vec<u8>)>;

    #[derive(Clone, Default)]
    struct Recorder {
        writes: Rc<RefCell<Writes>>,
    }

    /// A fake opened device: records writes tagged with its id, or fails.
    struct FakeSink {
        id: u32,
        fail: bool,
        rec: Recorder,
    }

    impl ReportSink for FakeSink {
        fn send_feature_report(&self, data: &[u8]) -> std::io::Result<()> {
            if self.fail {
                return Err(std::io::Error::other("No such device"));
            }
            self.rec.writes.borrow_mut().push((self.id, data.to_vec()));
            Ok(())
        }
    }

    /// An opener handing out devices with increasing ids; `plan` says, per
    /// open, None = not found, Some(fail) = a device whose writes fail or not.
    struct Opener {
        plan: RefCell<Vec<Option<bool>>>,
        opened: Cell<u32>,
        rec: Recorder,
    }

    impl Opener {
        fn new(plan: &[Option<bool>]) -> Self {
            Opener {
                plan: RefCell::new(plan.iter().rev().copied().collect()),
                opened: Cell::new(0),
                rec: Recorder::default(),
            }
        }
        fn open(&self) -> Result<FakeSink, BlinkStickError> {
            match self.plan.borrow_mut().pop().flatten() {
                None => Err(BlinkStickError::NotFound),
                Some(fail) => {
                    self.opened.set(self.opened.get() + 1);
                    Ok(FakeSink {
                        id: self.opened.get(),
                        fail,
                        rec: self.rec.clone(),
                    })
                }
            }
        }
        fn writes(&self) -> Writes {
            self.rec.writes.borrow().clone()
        }
    }

    #[test]
    fn write_report_sends_exact_bytes() {
        let rec = Recorder::default();
        let sink = FakeSink {
            id: 1,
            fail: false,
            rec: rec.clone(),
        };
        let seed = feature_report(Rgb::parse("#33c280").unwrap(), Some(1), 0, 10);
        write_report(&sink, &seed).unwrap();
        write_report(
            &sink,
            &feature_report(Rgb::new(0x33, 0xc2, 0x80), None, 0, 100),
        )
        .unwrap();
        write_report(&sink, &feature_report(Rgb::new(0, 0, 255), Some(4), 2, 100)).unwrap();
        write_report(&sink, &feature_report(Rgb::OFF, Some(1), 0, 10)).unwrap();
        assert_eq!(
            *rec.writes.borrow(),
            vec![
                (1, vec![5, 0, 1, 5, 19, 12]),
                (1, vec![1, 0x33, 0xc2, 0x80]),
                (1, vec![5, 2, 4, 0, 0, 255]),
                (1, vec![5, 0, 1, 0, 0, 0]),
            ]
        );
    }

    #[test]
    fn write_error_is_reported() {
        let sink = FakeSink {
            id: 1,
            fail: true,
            rec: Recorder::default(),
        };
        match write_report(&sink, &[1, 0, 0, 0]) {
            Err(BlinkStickError::Write(e)) => assert_eq!(e.to_string(), "No such device"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn set_opens_once_and_reuses_handle() {
        let op = Opener::new(&[Some(false)]);
        let mut slot = None;
        set_via(&mut slot, || op.open(), &[1, 2, 3, 4]).unwrap();
        set_via(&mut slot, || op.open(), &[1, 0, 0, 0]).unwrap();
        assert!(slot.is_some());
        assert_eq!(op.opened.get(), 1);
        assert_eq!(
            op.writes(),
            vec![(1, vec![1, 2, 3, 4]), (1, vec![1, 0, 0, 0])]
        );
    }

    #[test]
    fn set_not_found_leaves_slot_empty_then_finds_stick() {
        let op = Opener::new(&[None, Some(false)]);
        let mut slot = None;
        assert!(matches!(
            set_via(&mut slot, || op.open(), &[1, 9, 9, 9]),
            Err(BlinkStickError::NotFound)
        ));
        assert!(slot.is_none());
        // plugged in later: the next call opens it
        set_via(&mut slot, || op.open(), &[1, 9, 9, 9]).unwrap();
        assert!(slot.is_some());
        assert_eq!(op.writes(), vec![(1, vec![1, 9, 9, 9])]);
    }

    #[test]
    fn replugged_stick_is_reopened_and_write_retried() {
        // device 1 works, then goes stale (unplugged); device 2 is the replug.
        let op = Opener::new(&[Some(false), Some(false)]);
        let mut slot: Option<FakeSink> = None;
        set_via(&mut slot, || op.open(), &[1, 1, 1, 1]).unwrap();
        if let Some(dev) = slot.as_mut() {
            dev.fail = true;
        }
        set_via(&mut slot, || op.open(), &[5, 0, 1, 5, 19, 12]).unwrap();
        assert_eq!(slot.as_ref().map(|d| d.id), Some(2));
        assert_eq!(
            op.writes(),
            vec![(1, vec![1, 1, 1, 1]), (2, vec![5, 0, 1, 5, 19, 12])]
        );
    }

    #[test]
    fn stale_handle_and_no_stick_drops_handle() {
        let op = Opener::new(&[Some(false), None, Some(false)]);
        let mut slot: Option<FakeSink> = None;
        set_via(&mut slot, || op.open(), &[1, 1, 1, 1]).unwrap();
        if let Some(dev) = slot.as_mut() {
            dev.fail = true;
        }
        assert!(matches!(
            set_via(&mut slot, || op.open(), &[1, 2, 2, 2]),
            Err(BlinkStickError::NotFound)
        ));
        assert!(slot.is_none());
        set_via(&mut slot, || op.open(), &[1, 3, 3, 3]).unwrap();
        assert_eq!(
            op.writes(),
            vec![(1, vec![1, 1, 1, 1]), (2, vec![1, 3, 3, 3])]
        );
    }

    #[test]
    fn fresh_handle_write_error_is_returned_without_retry() {
        let op = Opener::new(&[Some(true), Some(false)]);
        let mut slot: Option<FakeSink> = None;
        assert!(matches!(
            set_via(&mut slot, || op.open(), &[1, 0, 0, 0]),
            Err(BlinkStickError::Write(_))
        ));
        assert!(slot.is_none());
        assert_eq!(op.opened.get(), 1);
        // next call opens again
        set_via(&mut slot, || op.open(), &[1, 0, 0, 0]).unwrap();
        assert_eq!(op.writes(), vec![(2, vec![1, 0, 0, 0])]);
    }

    // ---- the real hidapi type ----------------------------------------------

    #[test]
    fn blinkstick_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<BlinkStick>();
    }

    #[test]
    fn absent_stick_never_panics() {
        // A serial no real stick has, so this never touches hardware.
        let mut bs = BlinkStick::new(Some("ferry-test-no-such-stick".into()), Some(1), 0, 10);
        assert!(!bs.present());
        assert_eq!(
            bs.report_for(Rgb::parse("33c280").unwrap()),
            vec![5, 0, 1, 5, 19, 12]
        );
        let err = bs.set(Rgb::OFF).unwrap_err();
        assert!(matches!(err, BlinkStickError::NotFound));
        assert_eq!(
            err.to_string(),
            "no BlinkStick (20a0:41e5) found; plug it in or check the udev rule granting hidraw access"
        );
        assert!(!bs.present());
        assert!(format!("{bs:?}").contains("ferry-test-no-such-stick"));
    }
}
