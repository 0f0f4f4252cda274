"""Differential privacy: accountants and the site's privacy ledger."""
