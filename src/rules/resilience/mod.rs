//! The `resilience` section: for every Service, the DestinationRule its clients actually get.
//! [`resolve`] is istiod's lookup, pure.

pub mod resolve;
#[cfg(test)]
mod tests;
