"""The site's halves of federated harmonization: what a site computes and sends, and how it applies
the fitted parameters to its own data (which never leaves). The fitting halves are in
`analyses.harmonization`."""
