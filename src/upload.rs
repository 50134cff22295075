//! Upload workers (`upload-0`, ...): push one ready build to one provider and record the
//! upload in ZooKeeper. Filled in by the upload-pipeline work.
