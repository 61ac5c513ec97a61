"""Onboarding: helping every local user stay encrypted (welcome, security checkup, guard)."""
