"""The pipeline: fetch → validate → launch → wait → notify, shared by AWS and the local stack."""
