"""Git hosts a commit comes from: GitHub, the local git reader and the local hook that stands in for a webhook."""
