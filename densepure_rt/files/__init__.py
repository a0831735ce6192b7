"""Files: results (TSV + options, locks, resume), engine manifests, reports, and the data readers."""
