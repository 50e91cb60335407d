//! The shell: everything that does IO around the core.

pub mod simulate;
