"""Tests of the store backends and their shared conformance suite."""
