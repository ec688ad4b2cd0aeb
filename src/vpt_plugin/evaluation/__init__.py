"""Scoring of VPT answers: offline metrics and the paper's LLM judge."""
