"""Who may do what, and what happened: access policies (`policy`, `access`), the audit log (`audit`: its
format and writing; `audit_verify`, `audit_query`: reading it), lineage records of every produced artifact
(`lineage`), licence terms (`licences`), and the one gate every pipeline reads rows and records its output
through (`gate`: `open_rows`, `record_output`).

May import: `fmhub.base`, `fmhub.project`, `fmhub.plugin`, `fmhub.core`.
"""
