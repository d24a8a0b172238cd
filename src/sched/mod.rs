//! Scheduling: which waiting prompt goes to which backend. The decision itself is a pure
//! function over a snapshot (`decide`), so it unit-tests, benchmarks and runs in a simulation
//! without sockets, locks or clocks; whoever holds the prompt table and the fleet builds the
//! snapshot and applies the assignments.

pub mod decide;
pub mod outlook;

#[cfg(test)]
mod tests;
