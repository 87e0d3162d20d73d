"""The probes: their kinds (scikit-learn estimators), their files, and the bank that trains them."""
