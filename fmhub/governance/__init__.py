"""Who may do what, and what happened: access policies (`policy`, `access`), the audit log (`audit`),
lineage records of every produced artifact (`lineage`) and licence terms (`licences`).

May import: `fmhub.base`, `fmhub.project`, `fmhub.plugin`, `fmhub.core`.
"""
