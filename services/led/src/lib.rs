//! ferry-led: the status LED (org.ferry.Led1).
pub mod blinkstick;
