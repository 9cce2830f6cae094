//! The compact per-customer state store of one partition.
//!
//! A million customers must fit in about 150 MB, so there is no
//! per-customer allocation: every customer is a fixed-size record of
//! 32-bit words, whose stride depends on the model (one word per activity
//! sum, one per channel, two per remembered event id). The rooms:
//!
//! - [`layout`]: where each value sits in a record, the bit fields of its
//!   first word, the flags, and the record's shape under a model;
//! - [`record`]: read and write access to one record by those names;
//! - [`id`]: customer ids, inline in the record when short, else in an
//!   arena;
//! - [`index`]: the hash index from an id to its record's [`Slot`];
//! - [`table`]: all customers of a partition, dense, with the wake-up
//!   marks of the sweeps;
//! - [`snapshot_copy`]: the copy-on-write snapshot of the table;
//! - [`prefetch`]: the cache hints that let a batch load the next
//!   customers while it scores the current ones.

pub mod id;
pub mod index;
pub mod layout;
mod prefetch;
pub mod record;
mod snapshot_copy;
pub mod table;

pub use id::CustomerId;
pub use index::{Slot, SlotIndex};
pub use layout::{flags, header_word, Layout};
pub use prefetch::prefetch_lines;
pub use record::{Record, RecordMut};
pub use table::{CustomerTable, NewCustomer, Removed, TableFull};

#[cfg(test)]
mod tests;
