//! End-to-end tests live in tests/integration; this library is empty on purpose.
