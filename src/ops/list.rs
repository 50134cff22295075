//! `dib-image-list`, `image-list` and `image-status`: what nodepool 11's `status` module shows,
//! as PrettyTable text or as the launcher webapp's JSON.
//!
//! Rows are collected first (with ages as integral epoch seconds, as upstream stores them in
//! its row objects) and rendered second, so the JSON and the table come from the same data.
//! Reads retry after a connection loss; a record that is empty or unreadable is skipped, as
//! upstream's readers skip it.

use serde::Serialize;

use super::{OpsError, READ_RETRY, table};
use crate::model;
use crate::zk::{Result, Zk, lock, paths, tree};

/// One row of `dib-image-list`; field names are the webapp's JSON keys.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BuildRow {
    pub id: String,
    pub image: String,
    pub builder: Option<String>,
    pub formats: Vec<String>,
    pub state: String,
    /// `int(state_time)`.
    pub age: i64,
}

/// One row of `image-list`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UploadRow {
    /// The build id.
    pub id: String,
    pub upload_id: String,
    pub provider: String,
    pub image: String,
    pub external_name: Option<String>,
    pub external_id: Option<String>,
    pub state: String,
    pub age: i64,
}

/// One row of `image-status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatusRow {
    pub image: String,
    pub paused: bool,
    /// `pending` or `building`; `None` without a request.
    pub build_request: Option<&'static str>,
    /// The request znode's creation time, epoch seconds.
    pub build_request_age: Option<i64>,
}

pub fn dib_image_list(zk: &Zk, json: bool) -> std::result::Result<String, OpsError> {
    let headers = ["ID", "Image", "Builder", "Formats", "State", "Age"];
    listing(
        zk,
        json,
        build_rows,
        "builds",
        &headers,
        |r: &BuildRow, now| {
            vec![
                r.id.clone(),
                r.image.clone(),
                r.builder.clone().unwrap_or_default(),
                r.formats.join(","),
                r.state.clone(),
                format_age(now, r.age),
            ]
        },
    )
}

pub fn image_list(zk: &Zk, json: bool) -> std::result::Result<String, OpsError> {
    let headers = [
        "Build ID",
        "Upload ID",
        "Provider",
        "Image",
        "Provider Image Name",
        "Provider Image ID",
        "State",
        "Age",
    ];
    listing(
        zk,
        json,
        upload_rows,
        "uploads",
        &headers,
        |r: &UploadRow, now| {
            vec![
                r.id.clone(),
                r.upload_id.clone(),
                r.provider.clone(),
                r.image.clone(),
                r.external_name.clone().unwrap_or_default(),
                r.external_id.clone().unwrap_or_default(),
                r.state.clone(),
                format_age(now, r.age),
            ]
        },
    )
}

pub fn image_status(zk: &Zk, json: bool) -> std::result::Result<String, OpsError> {
    let headers = ["Image", "Paused", "Build Request", "Build Request Age"];
    listing(
        zk,
        json,
        status_rows,
        "images",
        &headers,
        |r: &StatusRow, now| {
            vec![
                r.image.clone(),
                if r.paused { "True" } else { "False" }.to_string(),
                r.build_request.unwrap_or_default().to_string(),
                r.build_request_age
                    .map(|t| format_age(now, t))
                    .unwrap_or_default(),
            ]
        },
    )
}

/// Reads the rows (retrying after a connection loss) and renders them as JSON or as a
/// table of `headers` with one `cells(row, now)` per row.
fn listing<R: Serialize>(
    zk: &Zk,
    json: bool,
    read: fn(&Zk) -> Result<Vec<R>>,
    what: &str,
    headers: &[&str],
    cells: impl Fn(&R, f64) -> Vec<String>,
) -> std::result::Result<String, OpsError> {
    let rows = zk.retry(READ_RETRY, read).map_err(OpsError::zk(format!(
        "reading the {what} under /nodepool/images"
    )))?;
    if json {
        return Ok(to_json(&rows));
    }
    let now = model::now_epoch();
    let cells: Vec<Vec<String>> = rows.iter().map(|r| cells(r, now)).collect();
    Ok(table::render(headers, &cells))
}

/// Every readable build, images by name, builds by `state_time` then id.
fn build_rows(zk: &Zk) -> Result<Vec<BuildRow>> {
    let mut rows = Vec::new();
    for image in tree::image_names(zk)? {
        let paused = zk.exists(&paths::image_pause_path(&image))?.is_some();
        for (id, build) in sorted_builds(zk, &image)? {
            rows.push(BuildRow {
                id: format!("{image}-{id}"),
                image: image.clone(),
                builder: build.builder,
                formats: build.formats,
                state: if paused {
                    "paused".to_string()
                } else {
                    build.state.to_string()
                },
                age: build.state_time as i64,
            });
        }
    }
    Ok(rows)
}

/// Every readable upload: images by name, builds by `state_time`, providers and uploads by
/// name.
fn upload_rows(zk: &Zk) -> Result<Vec<UploadRow>> {
    let mut rows = Vec::new();
    for image in tree::image_names(zk)? {
        for (build_id, _) in sorted_builds(zk, &image)? {
            let mut providers = tree::build_providers(zk, &image, &build_id)?;
            providers.sort();
            for provider in providers {
                let mut ids = tree::upload_ids(zk, &image, &build_id, &provider)?;
                ids.sort();
                for upload_id in ids {
                    let Some(upload) =
                        tree::read_upload(zk, &image, &build_id, &provider, &upload_id)?
                    else {
                        continue;
                    };
                    rows.push(UploadRow {
                        id: build_id.clone(),
                        upload_id,
                        provider: provider.clone(),
                        image: image.clone(),
                        external_name: upload.external_name,
                        external_id: upload.external_id,
                        state: upload.state.to_string(),
                        age: upload.state_time as i64,
                    });
                }
            }
        }
    }
    Ok(rows)
}

/// Every image name with its pause flag and build request.
fn status_rows(zk: &Zk) -> Result<Vec<StatusRow>> {
    let mut rows = Vec::new();
    for image in tree::image_names(zk)? {
        let request = zk.exists(&paths::image_build_request_path(&image))?;
        let (build_request, build_request_age) = match request {
            Some(stat) => {
                let building =
                    !lock::contenders(zk, &paths::image_build_lock_path(&image))?.is_empty();
                (
                    Some(if building { "building" } else { "pending" }),
                    Some(stat.ctime.div_euclid(1000)),
                )
            }
            None => (None, None),
        };
        rows.push(StatusRow {
            paused: zk.exists(&paths::image_pause_path(&image))?.is_some(),
            image,
            build_request,
            build_request_age,
        });
    }
    Ok(rows)
}

/// The readable builds of an image, oldest `state_time` first.
fn sorted_builds(zk: &Zk, image: &str) -> Result<Vec<(String, crate::zk::schema::ImageBuild)>> {
    let mut builds = Vec::new();
    for id in tree::build_ids(zk, image)? {
        if let Some(build) = tree::read_build(zk, image, &id)? {
            builds.push((id, build));
        }
    }
    builds.sort_by(|a, b| {
        a.1.state_time
            .total_cmp(&b.1.state_time)
            .then_with(|| a.0.cmp(&b.0))
    });
    Ok(builds)
}

/// `DD:HH:MM:SS` since `epoch` (whole seconds), as upstream's `age()`; the future is zero.
pub fn format_age(now: f64, epoch: i64) -> String {
    let secs = (now - epoch as f64).max(0.0) as u64;
    let (m, s) = (secs / 60, secs % 60);
    let (h, m) = (m / 60, m % 60);
    let (d, h) = (h / 24, h % 24);
    format!("{d:02}:{h:02}:{m:02}:{s:02}")
}

fn to_json<T: Serialize>(rows: &[T]) -> String {
    serde_json::to_string(rows).expect("rows serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_days_hours_minutes_seconds() {
        assert_eq!(format_age(1000.9, 1000), "00:00:00:00");
        assert_eq!(format_age(1045.2, 1000), "00:00:00:45");
        assert_eq!(format_age(1000.0 + 215.0, 1000), "00:00:03:35");
        assert_eq!(
            format_age(86400.0 * 3.0 + 3600.0 * 5.0 + 61.0, 0),
            "03:05:01:01"
        );
        assert_eq!(format_age(86400.0 * 123.0, 0), "123:00:00:00");
        assert_eq!(format_age(10.0, 20), "00:00:00:00");
    }

    #[test]
    fn json_uses_the_webapp_field_names() {
        let row = BuildRow {
            id: "img-00ff".into(),
            image: "img".into(),
            builder: None,
            formats: vec!["qcow2".into(), "raw".into()],
            state: "ready".into(),
            age: 17,
        };
        assert_eq!(
            to_json(&[row]),
            r#"[{"id":"img-00ff","image":"img","builder":null,"formats":["qcow2","raw"],"state":"ready","age":17}]"#
        );
        let status = StatusRow {
            image: "img".into(),
            paused: true,
            build_request: None,
            build_request_age: None,
        };
        assert_eq!(
            to_json(&[status]),
            r#"[{"image":"img","paused":true,"build_request":null,"build_request_age":null}]"#
        );
    }
}
