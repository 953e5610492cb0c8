"""Subject discovery: HCP layouts and flat folders of NIfTI files."""
from __future__ import annotations

# The HCP unprocessed T1w path of one subject, relative to the HCP root (paper, II-C).
HCP_T1W = "{subject}/unprocessed/3T/T1w_MPR1/{subject}_3T_T1w_MPR1.nii.gz"
# The minimally preprocessed alternative (`data.layout: hcp_acpc`).
HCP_T1W_ACPC = "{subject}/T1w/T1w_acpc_dc_restore.nii.gz"
