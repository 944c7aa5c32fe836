//! Who may see what: a bearer JWT whose claim (`topics` by default) lists the topic patterns its
//! holder may subscribe to, as Mercure's `mercure.subscribe` does; signed with the HS256 secret,
//! or with an RS256/ES256 key of the JWKS file (found by the token's `kid`). Patterns granted
//! without a token, if any, are configured (`FLEET_GATEWAY_ANONYMOUS_TOPICS`).

use std::path::Path;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use streamfleet::event::pattern::ChannelPattern;
use streamfleet::runtime::config::ConfigError;

/// How much clock skew an `exp` or `nbf` is allowed, in seconds.
const LEEWAY_S: u64 = 5;

/// Why a request is refused: 401 for the token, 403 for a topic outside what it grants.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("a bearer token is required")]
    NoToken,
    #[error("invalid token: {0}")]
    BadToken(String),
    #[error("topic {0} is not granted")]
    Topic(String),
}

/// The verification keys, the claim's name, and what anyone may see.
pub struct Auth {
    secret: Option<DecodingKey>,
    /// (kid, algorithm, key) of every usable JWKS key.
    jwks: Vec<(Option<String>, Algorithm, DecodingKey)>,
    claim: String,
    audience: Option<String>,
    anonymous: Vec<ChannelPattern>,
}

impl Auth {
    /// Reads the keys; an unreadable JWKS file, a key of an unsupported kind or a bad pattern is
    /// a configuration error naming the setting. No key and no anonymous topic would refuse every
    /// request: also an error.
    pub fn new(
        secret: Option<&str>,
        jwks_file: Option<&Path>,
        claim: &str,
        audience: Option<&str>,
        anonymous: &[String],
    ) -> Result<Auth, ConfigError> {
        let secret = match secret {
            Some(s) if s.len() < 32 => return Err(ConfigError(
                "FLEET_GATEWAY_JWT_SECRET: at least 32 bytes (an HS256 key as long as its hash)"
                    .into(),
            )),
            Some(s) => Some(DecodingKey::from_secret(s.as_bytes())),
            None => None,
        };
        let jwks = match jwks_file {
            Some(path) => {
                let fail = |e: String| {
                    ConfigError(format!("FLEET_GATEWAY_JWKS_FILE {}: {e}", path.display()))
                };
                let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
                let set: JwkSet = serde_json::from_str(&text).map_err(|e| fail(e.to_string()))?;
                let mut keys = Vec::new();
                for jwk in &set.keys {
                    let alg = match (&jwk.algorithm, jwk.common.key_algorithm) {
                        (_, Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
                        (_, Some(KeyAlgorithm::ES256)) => Algorithm::ES256,
                        (AlgorithmParameters::RSA(_), None) => Algorithm::RS256,
                        (AlgorithmParameters::EllipticCurve(ec), None)
                            if ec.curve == EllipticCurve::P256 =>
                        {
                            Algorithm::ES256
                        }
                        _ => {
                            return Err(fail(format!(
                                "key {:?} is neither RS256 nor ES256 (P-256)",
                                jwk.common.key_id.as_deref().unwrap_or("without kid")
                            )))
                        }
                    };
                    let key = DecodingKey::from_jwk(jwk).map_err(|e| fail(e.to_string()))?;
                    keys.push((jwk.common.key_id.clone(), alg, key));
                }
                if keys.is_empty() {
                    return Err(fail("no key".into()));
                }
                keys
            }
            None => Vec::new(),
        };
        let anonymous = anonymous
            .iter()
            .map(|t| t.trim())
            .filter(|t| !t.is_empty())
            .map(|t| {
                t.parse()
                    .map_err(|e| ConfigError(format!("FLEET_GATEWAY_ANONYMOUS_TOPICS: {e}")))
            })
            .collect::<Result<Vec<ChannelPattern>, _>>()?;
        if secret.is_none() && jwks.is_empty() && anonymous.is_empty() {
            return Err(ConfigError(
                "FLEET_GATEWAY_JWT_SECRET, FLEET_GATEWAY_JWKS_FILE or FLEET_GATEWAY_ANONYMOUS_TOPICS: none is set, so every request would be refused".into(),
            ));
        }
        if claim.trim().is_empty() {
            return Err(ConfigError(
                "FLEET_GATEWAY_JWT_CLAIM: must not be empty".into(),
            ));
        }
        Ok(Auth {
            secret,
            jwks,
            claim: claim.to_owned(),
            audience: audience.map(str::to_owned),
            anonymous,
        })
    }

    /// Whether `token` (or no token) may subscribe to every one of `topics`.
    pub fn check(&self, token: Option<&str>, topics: &[ChannelPattern]) -> Result<(), Denied> {
        let anonymous = |t: &ChannelPattern| self.anonymous.iter().any(|g| g.covers(t));
        let granted = match token {
            None if topics.iter().all(anonymous) => return Ok(()),
            None => return Err(Denied::NoToken),
            Some(token) => self.grants(token)?,
        };
        match topics
            .iter()
            .find(|t| !anonymous(t) && !granted.iter().any(|g| g.covers(t)))
        {
            Some(t) => Err(Denied::Topic(t.to_string())),
            None => Ok(()),
        }
    }

    /// The topic patterns a valid token grants.
    fn grants(&self, token: &str) -> Result<Vec<ChannelPattern>, Denied> {
        let bad = |e: &dyn std::fmt::Display| Denied::BadToken(e.to_string());
        let header = jsonwebtoken::decode_header(token).map_err(|e| bad(&e))?;
        let key = match header.alg {
            Algorithm::HS256 => self.secret.as_ref(),
            alg @ (Algorithm::RS256 | Algorithm::ES256) => self
                .jwks
                .iter()
                .filter(|(_, a, _)| *a == alg)
                .find(|(kid, _, _)| header.kid.is_none() || kid == &header.kid)
                .map(|(_, _, key)| key),
            _ => None,
        }
        .ok_or_else(|| bad(&format!("no key for {:?} here", header.alg)))?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_S;
        match &self.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        let data = jsonwebtoken::decode::<serde_json::Value>(token, key, &validation)
            .map_err(|e| bad(&e))?;
        let claim = data
            .claims
            .get(&self.claim)
            .ok_or_else(|| bad(&format!("no {:?} claim", self.claim)))?;
        let patterns: Vec<&str> = match claim {
            serde_json::Value::String(s) => vec![s],
            serde_json::Value::Array(items) => items.iter().filter_map(|v| v.as_str()).collect(),
            _ => return Err(bad(&format!("{:?} is not a list of topics", self.claim))),
        };
        patterns
            .into_iter()
            .map(|p| p.parse().map_err(|e| bad(&e)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn topics(t: &[&str]) -> Vec<ChannelPattern> {
        t.iter().map(|t| t.parse().unwrap()).collect()
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn hs(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn auth(anonymous: &[&str]) -> Auth {
        let anonymous: Vec<String> = anonymous.iter().map(|s| s.to_string()).collect();
        Auth::new(Some(SECRET), None, "topics", None, &anonymous).unwrap()
    }

    #[test]
    fn a_token_grants_the_topics_its_claim_covers() {
        let a = auth(&[]);
        let token = hs(
            json!({"exp": now() + 60, "topics": ["flow.42.#", "user.*"]}),
            SECRET,
        );
        let ok = |t: &[&str]| a.check(Some(&token), &topics(t));
        assert_eq!(ok(&["flow.42.progress", "user.7"]), Ok(()));
        assert_eq!(ok(&["flow.42.#"]), Ok(()));
        assert_eq!(
            ok(&["flow.43.progress"]),
            Err(Denied::Topic("flow.43.progress".into()))
        );
        assert_eq!(ok(&["user.#"]), Err(Denied::Topic("user.#".into())));
        assert_eq!(
            ok(&["flow.*.progress"]),
            Err(Denied::Topic("flow.*.progress".into()))
        );
    }

    #[test]
    fn expired_forged_and_claimless_tokens_are_refused() {
        let a = auth(&[]);
        let t = topics(&["flow.42.progress"]);
        let expired = hs(json!({"exp": now() - 60, "topics": ["#"]}), SECRET);
        assert!(
            matches!(a.check(Some(&expired), &t), Err(Denied::BadToken(e)) if e.contains("xpired"))
        );
        let forged = hs(
            json!({"exp": now() + 60, "topics": ["#"]}),
            "another secret of thirty-two bytes!",
        );
        assert!(
            matches!(a.check(Some(&forged), &t), Err(Denied::BadToken(e)) if e.contains("ignature"))
        );
        let no_claim = hs(json!({"exp": now() + 60}), SECRET);
        assert!(
            matches!(a.check(Some(&no_claim), &t), Err(Denied::BadToken(e)) if e.contains("topics"))
        );
        let no_exp = hs(json!({"topics": ["#"]}), SECRET);
        assert!(matches!(
            a.check(Some(&no_exp), &t),
            Err(Denied::BadToken(_))
        ));
        assert!(matches!(
            a.check(Some("not.a.token"), &t),
            Err(Denied::BadToken(_))
        ));
        assert_eq!(a.check(None, &t), Err(Denied::NoToken));
    }

    #[test]
    fn anonymous_topics_need_no_token_and_the_rest_still_do() {
        let a = auth(&["public.#"]);
        assert_eq!(a.check(None, &topics(&["public.news"])), Ok(()));
        assert_eq!(
            a.check(None, &topics(&["public.news", "flow.1"])),
            Err(Denied::NoToken)
        );
        let token = hs(json!({"exp": now() + 60, "topics": ["flow.1"]}), SECRET);
        assert_eq!(
            a.check(Some(&token), &topics(&["public.news", "flow.1"])),
            Ok(())
        );
    }

    #[test]
    fn an_rs256_or_es256_key_from_the_jwks_file_verifies_by_kid() {
        // A P-256 key pair and an RSA one, generated once for this test (openssl).
        let dir = std::env::temp_dir().join(format!("gw-jwks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let jwks = dir.join("jwks.json");
        std::fs::write(&jwks, TEST_JWKS).unwrap();
        let a = Auth::new(None, Some(&jwks), "topics", Some("browsers"), &[]).unwrap();
        let t = topics(&["flow.1"]);
        let claims = json!({"exp": now() + 60, "aud": "browsers", "topics": ["flow.#"]});
        let mut es = Header::new(Algorithm::ES256);
        es.kid = Some("ec-1".into());
        let es_key = EncodingKey::from_ec_pem(TEST_EC_PEM.as_bytes()).unwrap();
        assert_eq!(
            a.check(Some(&encode(&es, &claims, &es_key).unwrap()), &t),
            Ok(())
        );
        let mut rs = Header::new(Algorithm::RS256);
        rs.kid = Some("rsa-1".into());
        let rs_key = EncodingKey::from_rsa_pem(TEST_RSA_PEM.as_bytes()).unwrap();
        assert_eq!(
            a.check(Some(&encode(&rs, &claims, &rs_key).unwrap()), &t),
            Ok(())
        );
        // The wrong audience, an unknown kid, an HS256 token with no secret configured.
        let other_aud = json!({"exp": now() + 60, "aud": "others", "topics": ["#"]});
        assert!(a
            .check(Some(&encode(&rs, &other_aud, &rs_key).unwrap()), &t)
            .is_err());
        rs.kid = Some("rsa-2".into());
        assert!(a
            .check(Some(&encode(&rs, &claims, &rs_key).unwrap()), &t)
            .is_err());
        assert!(a.check(Some(&hs(claims.clone(), SECRET)), &t).is_err());
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn settings_that_would_refuse_everything_or_are_bad_are_configuration_errors() {
        let err = |r: Result<Auth, ConfigError>| r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err(Auth::new(None, None, "topics", None, &[])).contains("every request"));
        assert!(err(Auth::new(Some("short"), None, "topics", None, &[])).contains("32 bytes"));
        assert!(err(Auth::new(None, None, "topics", None, &["Bad!".into()]))
            .starts_with("FLEET_GATEWAY_ANONYMOUS_TOPICS"));
        assert!(err(Auth::new(
            None,
            Some(Path::new("/nonexistent/jwks.json")),
            "topics",
            None,
            &[]
        ))
        .starts_with("FLEET_GATEWAY_JWKS_FILE /nonexistent/jwks.json"));
    }

    pub(crate) const TEST_EC_PEM: &str = include_str!("../testdata/ec.pem");
    pub(crate) const TEST_RSA_PEM: &str = include_str!("../testdata/rsa.pem");
    pub(crate) const TEST_JWKS: &str = include_str!("../testdata/jwks.json");
}
