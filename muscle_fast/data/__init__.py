"""Data shipped with muscle-fast, so a fresh clone runs offline (see ``SOURCES.md`` here).

``sst2.parquet`` holds the poisoned SST-2 released with the MuScleLoRA paper (four attacks)
and the clean SST-2 split; ``sst2.json`` maps each file of the release to its rows. Read it
through ``muscle_fast.backdoor.data`` (``embedded:sst2``); ``build_sst2`` rebuilds it.
"""
