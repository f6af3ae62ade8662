//! ferry-crypt (to be written)
