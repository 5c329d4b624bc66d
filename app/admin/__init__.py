"""Operators: API keys, their verification, and the audit trail (docs/operations.md, "Operators")."""
