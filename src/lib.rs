//! bmr as a library: the modules the `bmr` binary is made of, open to the
//! fuzz targets in fuzz/ (cargo-fuzz needs a library to link against).

pub mod apply;
pub mod boot;
pub mod capture;
pub mod cli;
pub mod image;
pub mod manifest;
pub mod medium;
pub mod plan;
pub mod probe;
pub mod recover;
pub mod report;
pub mod rescue;
pub mod sys;
pub mod targets;
pub mod tool;
pub mod tui;
