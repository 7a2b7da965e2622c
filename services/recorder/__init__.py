"""Recorder: the single writer of the hot tables, fed by the journal."""
