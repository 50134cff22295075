//! Build workers (`build-0`, `build-1`, ...): run diskimage-builder for one build job and
//! record the result in ZooKeeper. Filled in by the build-pipeline work.
