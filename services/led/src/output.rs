//! Where the colour goes: a BlinkStick, a file, or nowhere.

use std::io::Write;
use std::path::PathBuf;

use ferry_config::{Color, Led, LedBackend};

use crate::blinkstick::{BlinkStick, BlinkStickError};

/// Why a colour could not be shown.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The BlinkStick is missing or its write failed.
    #[error(transparent)]
    BlinkStick(#[from] BlinkStickError),
    /// The file backend's file cannot be opened.
    #[error("cannot open {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file backend's file cannot be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

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
    /// Blocking (a HID write, a file append): the service calls it off its
    /// runtime.
    pub fn show(&mut self, color: Color, label: &str) -> Result<(), OutputError> {
        match self {
            Output::BlinkStick(stick) => Ok(stick.set(color)?),
            Output::File(path) => {
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&*path)
                    .map_err(|source| OutputError::Open {
                        path: path.clone(),
                        source,
                    })?;
                writeln!(file, "{} {label}", color.to_hex()).map_err(|source| OutputError::Write {
                    path: path.clone(),
                    source,
                })
            }
            Output::None => Ok(()),
        }
    }
}
