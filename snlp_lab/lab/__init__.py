"""The lab: profiles and studies, where outputs go, reports, the claims ledger, `make figures` and the GPU check."""
