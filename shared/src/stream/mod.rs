//! What a Redis stream holds and what the fleet keeps beside it: entry ids, an entry's fields,
//! and the names of the keys kept beside a stream with their hash slots. The base every layer
//! shares (the v1 contract, the source, the pipeline, the stores); it imports none of them.

pub mod cut;
pub mod fields;
pub mod groups;
pub mod id;
pub mod keys;

pub use fields::Fields;
pub use id::{BadEntryId, EntryId};
