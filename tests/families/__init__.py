"""Pose families that exist only for the tests: each is a catalogue entry plus one module, like a real one."""
