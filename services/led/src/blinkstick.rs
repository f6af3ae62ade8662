//! BlinkStick USB LED: report layouts and the hidapi device.
