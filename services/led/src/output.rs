//! Where the colour goes: a BlinkStick, a file, or nowhere.

use std::io::Write;
use std::path::PathBuf;

use ferry_config::{Color, Led, LedBackend};

use crate::blinkstick::BlinkStick;

/// The configured LED backend.
#[derive(Debug)]
pub enum Output {
    /// A BlinkStick on USB.
    BlinkStick(Box<BlinkStick>),
    /// Appends `#rrggbb state` lines to a file.
    File(PathBuf),
    /// Shows nothing.
    None,
}

impl Output {
    /// The backend `[led]` asks for.
    pub fn from_config(led: &Led) -> Output {
        match led.backend {
            LedBackend::Blinkstick => Output::BlinkStick(Box::new(BlinkStick::new(
                led.serial.clone(),
                led.index,
                led.channel,
                led.brightness_limit,
            ))),
            LedBackend::File => match &led.file {
                Some(path) => Output::File(path.to_path_buf()),
                None => Output::None, // the config check requires a file; never reached
            },
            LedBackend::None => Output::None,
        }
    }

    /// The backend's name for the Backend property.
    pub fn name(&self) -> &'static str {
        match self {
            Output::BlinkStick(_) => "blinkstick",
            Output::File(_) => "file",
            Output::None => "none",
        }
    }

    /// Whether the device can be written now.
    pub fn present(&self) -> bool {
        match self {
            Output::BlinkStick(stick) => stick.present(),
            Output::File(_) | Output::None => true,
        }
    }

    /// Shows `color`; `label` is what the file backend records beside it.
    pub fn show(&mut self, color: Color, label: &str) -> Result<(), String> {
        match self {
            Output::BlinkStick(stick) => stick.set(color).map_err(|e| e.to_string()),
            Output::File(path) => {
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&*path)
                    .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
                writeln!(file, "{} {label}", color.to_hex())
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))
            }
            Output::None => Ok(()),
        }
    }
}
