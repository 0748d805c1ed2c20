"""C code generation: the scheduled, planned training step as a C99 project for the host or a Cortex-M4."""
