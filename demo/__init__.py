"""`make demo`: three hospitals end to end, played by one person in their three roles.

    python -m demo [--small] [--keep-sites] [--work DIR] [--report DIR]

1. hospital IT: phantom DICOM of three different scanners, three datasites up, cases ingested;
2. data scientist: sends the radiomics-heterogeneity and the training requests (`federate`);
3. clinic admins: list, inspect and approve them (`datasite-admin`);
4. data scientist: heterogeneity before/after Nyul harmonization, FedAvg and FedProx with
   local-only and centralized baselines;
5. an HTML report (tables and plots) in `--report`;
6. the datasites are stopped again, also on failure or Ctrl-C (unless `--keep-sites`).

Every step is the project's own command line, run as a person would and printed with its output,
so the demo doubles as a script to copy from. A second run reuses what exists under `--work`
(phantom DICOM, ingested datasets, approvals, finished training rounds, radiomics results).
`--small` (tiny phantoms, 2 rounds) is what the tests run; it lives in its own sub-folder of
`--work`, so it never mixes with the full-size sites.

The demo is run from the repository root and is not installed with the project: hospitals and
data scientists install `datasite_setup` and `analyses`, not a script that plays every role.

Modules, one role each: `hospital_it`, `clinic_admin`, `data_scientist`; `layout` (sizes and
folders), `commands` (running the project's command lines), `run` (the whole flow).

Exit codes: 0 done; 1 a step failed (its command and output are printed); 130 interrupted.
"""
