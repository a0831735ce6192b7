"""Statistics, pure: counts in, certificates out (Cohen et al.'s CERTIFY/PREDICT, the anytime-valid sequential tests, the vote)."""
