//! Kubelet credential provider plugins (`--image-credential-provider-config` and
//! `--image-credential-provider-bin-dir`), for registries whose tokens expire (ECR, GCR, ACR
//! style): the plugin whose `matchImages` match an image is run for it, and its answer is
//! cached for the duration it names (else the provider's `defaultCacheDuration`; zero: not
//! cached), keyed by image, registry or nothing as its `cacheKeyType` says.

mod config;
mod duration;
mod exec;
mod matching;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::auth::Credential;
use super::error::CredentialsError;
pub use config::Provider;
use exec::{Answer, CacheKeyType};

/// How long a plugin may take before it is killed (kubelet allows a minute; a lazy read that
/// waits for it waits this long).
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The providers of one config file, with their answers' cache.
#[derive(Debug)]
pub struct CredentialProviders {
    providers: Vec<Provider>,
    bin_dir: PathBuf,
    timeout: Duration,
    /// By (provider, cache key); an entry is dropped once it expires.
    answers: Mutex<HashMap<(String, String), Cached>>,
}

#[derive(Debug)]
struct Cached {
    answer: Answer,
    until: Instant,
}

impl CredentialProviders {
    /// Reads `config`; plugins are run from `bin_dir`.
    pub fn load(config: &Path, bin_dir: &Path) -> Result<CredentialProviders, CredentialsError> {
        Ok(CredentialProviders::new(config::load(config)?, bin_dir))
    }

    pub fn new(providers: Vec<Provider>, bin_dir: &Path) -> CredentialProviders {
        CredentialProviders {
            providers,
            bin_dir: bin_dir.to_owned(),
            timeout: PLUGIN_TIMEOUT,
            answers: Mutex::default(),
        }
    }

    /// Parses a config's text, for tests.
    pub fn parse(text: &[u8], bin_dir: &Path) -> Result<CredentialProviders, String> {
        Ok(CredentialProviders::new(config::parse(text)?, bin_dir))
    }

    /// Kills plugins that take longer than `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> CredentialProviders {
        self.timeout = timeout;
        self
    }

    /// The names of the providers, for an error that found no credentials.
    pub fn names(&self) -> Vec<&str> {
        self.providers.iter().map(|p| p.name.as_str()).collect()
    }

    /// The credential of the first provider matching `repository` on `host` that has one,
    /// from the cache or a run of its plugin.
    pub async fn get(
        &self,
        host: &str,
        repository: &str,
    ) -> Result<Option<Credential>, CredentialsError> {
        let image = format!("{host}/{repository}");
        for provider in &self.providers {
            if !provider
                .match_images
                .iter()
                .any(|pattern| matching::matches(pattern, &image))
            {
                continue;
            }
            let answer = match self.cached(provider, host, &image) {
                Some(answer) => answer,
                None => {
                    // No lock held while the plugin runs: two misses at once run it twice.
                    let answer = exec::run(provider, &self.bin_dir, &image, self.timeout).await?;
                    self.remember(provider, host, &image, &answer);
                    answer
                }
            };
            if let Some(credential) = pick(&answer, &image) {
                return Ok(Some(credential));
            }
        }
        Ok(None)
    }

    fn cached(&self, provider: &Provider, host: &str, image: &str) -> Option<Answer> {
        let now = Instant::now();
        let mut answers = self.answers.lock();
        answers.retain(|_, cached| cached.until > now);
        [image, host, ""].iter().find_map(|key| {
            answers
                .get(&(provider.name.clone(), (*key).to_owned()))
                .map(|cached| cached.answer.clone())
        })
    }

    fn remember(&self, provider: &Provider, host: &str, image: &str, answer: &Answer) {
        let lasts = answer
            .cache_duration
            .unwrap_or(provider.default_cache_duration);
        if lasts.is_zero() {
            return;
        }
        let key = match answer.cache_key_type {
            CacheKeyType::Image => image,
            CacheKeyType::Registry => host,
            CacheKeyType::Global => "",
        };
        self.answers.lock().insert(
            (provider.name.clone(), key.to_owned()),
            Cached {
                answer: answer.clone(),
                until: Instant::now() + lasts,
            },
        );
    }
}

/// The answer's credential for `image`: its most specific (longest) matching pattern's.
fn pick(answer: &Answer, image: &str) -> Option<Credential> {
    answer
        .auth
        .iter()
        .filter(|(pattern, _)| matching::matches(pattern, image))
        .max_by_key(|(pattern, _)| pattern.len())
        .map(|(_, credential)| credential.clone())
}

#[cfg(test)]
mod tests;
