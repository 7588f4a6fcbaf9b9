//! The Kubernetes operator for `KordCluster` resources. Not built yet: issue #8.
