//! ZooKeeper layer.
