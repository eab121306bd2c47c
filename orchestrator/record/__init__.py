"""What lands on disk: the Parquet results and trials (:mod:`.results`), the analyses, the SQLite
stores that a kill cannot leave half made (:mod:`.stores`), provenance, and the one reader of a
results folder while a sweep runs (:mod:`.records`)."""
