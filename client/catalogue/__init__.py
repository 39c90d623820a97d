"""Catalogue jobs (docs/CATALOGUE.md): a file of products and scenes rendered as one resumable job.

Rooms: `spec` (the file: parse, check), `plan` (items, ids, seeds, shards), `runner` (requests, flow
control, resume), `results` (the job folder: index, summary, gallery, zip), `progress` (what a person or
a machine reads while it runs), `commands` (the CLI's `catalogue` subcommands).
"""
