"""What a project declares: ``fmhub.yaml``'s schema (`fmhub.project.spec`), its loading and validation with
line-numbered errors, and the resolution of declared paths and models.

May import: `fmhub.base`.
"""
