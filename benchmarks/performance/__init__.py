"""Performance: start-up, load, the audit off the critical path, bytes on the wire, faults."""
