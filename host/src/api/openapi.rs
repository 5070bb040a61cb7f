//! `GET /openapi.json`: the HTTP API as an OpenAPI 3.1 document, generated
//! by `utoipa` from the handlers' `#[utoipa::path]` attributes and the
//! payload types (`ToSchema` on the store's rows, the invoices and the
//! vocabularies). The request body of the telemetry routes is described by
//! [`ReadingIn`], the fields `ingest::validate` checks (it parses bodies
//! without a serde type, for speed).
//!
//! A test reads the router's source and checks every route it declares is
//! in the document, so a new route cannot be left out.

use utoipa::{OpenApi, ToSchema};

/// One smart-meter reading as posted (the seed's fields).
#[allow(dead_code)]
#[derive(ToSchema)]
#[schema(rename_all = "camelCase")]
pub struct ReadingIn {
    /// Non-empty; the client's id for the reading.
    reading_id: String,
    /// Non-empty, e.g. `MTR-00000042`.
    meter_id: String,
    user_id: Option<String>,
    /// Non-empty, e.g. `Mumbai-North`.
    region: String,
    /// ISO 8601 with a zone, within `ingest.max_clock_skew_s` ahead and
    /// `ingest.max_reading_age_s` back of the server clock.
    #[schema(format = DateTime)]
    timestamp: String,
    /// ≥ 0.
    power_kw: f64,
    voltage: Option<f64>,
    current: Option<f64>,
    frequency: Option<f64>,
    /// In [0, 1].
    power_factor: Option<f64>,
    temperature: Option<f64>,
    energy_kwh: Option<f64>,
    seq: Option<u64>,
    status: Option<String>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "segs",
        description = "Smart Energy Grid stream host: telemetry in, windows, rules, store."
    ),
    paths(
        crate::ingest::post_batch,
        crate::ingest::post_one,
        super::healthz,
        super::readyz,
        super::metrics,
        super::events::events,
        super::openapi_json,
        super::dashboard,
        super::list_alerts,
        super::acknowledge,
        super::resolve,
        super::current_tariffs,
        super::tariff_history,
        super::aggregates_1m,
        super::aggregates_15m,
        super::aggregates_regional,
        super::list_invoices,
        super::admin::list,
        super::admin::push,
        super::admin::rollback,
        super::admin::parked_letters,
        super::admin::replay_dead_letters,
    ),
    components(schemas(
        ReadingIn,
        crate::ingest::IngestAnswer,
        super::ErrorBody,
        crate::store::AlertRow,
        crate::store::TariffRow,
        crate::store::MeterAggregate,
        crate::store::RegionalAggregate,
        crate::billing::Invoice,
        crate::billing::InvoiceLine,
        crate::pipeline::dead_letters::ReplayReport,
    ))
)]
pub struct ApiDoc;

/// The document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(METHOD, /path)` of every `.route("…", method(…))` in the router's
    /// source, chained methods included.
    fn declared_routes() -> Vec<(String, String)> {
        let source = [include_str!("mod.rs"), include_str!("admin.rs")].concat();
        let mut out = Vec::new();
        for part in source.split(".route(\"").skip(1) {
            let Some((path, rest)) = part.split_once('"') else {
                continue;
            };
            // rustfmt keeps `.route("/p", get(h).post(h2))` on one line.
            let line = rest.lines().next().unwrap_or_default();
            for m in ["get", "post", "put", "delete", "patch"] {
                if line.contains(&format!(" {m}(")) || line.contains(&format!(".{m}(")) {
                    out.push((m.to_uppercase(), path.to_owned()));
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    #[test]
    fn every_route_of_the_router_is_in_the_document() {
        let doc = document();
        let declared = declared_routes();
        assert!(declared.len() >= 20, "{declared:?}");
        let mut missing = Vec::new();
        for (method, path) in &declared {
            let item = doc.paths.paths.get(path);
            let has = item.is_some_and(|i| match method.as_str() {
                "GET" => i.get.is_some(),
                "POST" => i.post.is_some(),
                "PUT" => i.put.is_some(),
                "DELETE" => i.delete.is_some(),
                "PATCH" => i.patch.is_some(),
                _ => false,
            });
            if !has {
                missing.push(format!("{method} {path}"));
            }
        }
        assert!(missing.is_empty(), "not in /openapi.json: {missing:?}");
        // …and the document names nothing the router does not serve.
        let documented: usize = doc
            .paths
            .paths
            .values()
            .map(|i| {
                [&i.get, &i.post, &i.put, &i.delete, &i.patch]
                    .iter()
                    .filter(|o| o.is_some())
                    .count()
            })
            .sum();
        assert_eq!(documented, declared.len());
    }

    #[test]
    fn row_schemas_carry_the_seeds_column_names() {
        let json = serde_json::to_value(document()).unwrap();
        let alert = &json["components"]["schemas"]["AlertRow"]["properties"];
        assert!(alert["type"].is_object(), "{alert}");
        assert_eq!(alert["timestamp"]["format"], "date-time");
        let reading = &json["components"]["schemas"]["ReadingIn"]["properties"];
        assert!(reading["meterId"].is_object() && reading["powerKw"].is_object());
    }
}
