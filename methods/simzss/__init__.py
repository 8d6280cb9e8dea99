"""SimZSS."""
