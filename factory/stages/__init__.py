"""Pipeline stages: plain classes, testable without Ray."""
