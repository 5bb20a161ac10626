//! Root package of the Tessera workspace. It holds no code of its own: its
//! `tests/` folder runs the `worker` and `coordinator` binaries end to end.
