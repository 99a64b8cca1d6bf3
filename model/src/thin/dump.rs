//! (being written by the checker work)
