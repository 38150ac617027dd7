"""Binary-only vendor stacks: a CLI compiler and a C runtime, driven from a spec file
(docs/binary_backends.md)."""
