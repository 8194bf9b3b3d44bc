"""Small helpers shared by the test suites (real processes and sockets, no mocks)."""
