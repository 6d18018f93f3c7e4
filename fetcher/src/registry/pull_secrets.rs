//! Pull secrets: the credentials kubelet gave containerd's CRI plugin for an image (a pod's
//! `imagePullSecrets`), as the CRI proxy saw them pass in `PullImage`. containerd keeps them
//! to itself, so the snapshotter's lazy reads of the image's layers would find none; the proxy
//! records them here, and the registry client asks here first for the image's repository.
//!
//! In memory only: nothing here is written anywhere, and [`Credential`]'s `Debug` hides the
//! password. A recording lasts until the image is removed (or the daemon stops); a credential
//! withdrawn or replaced also ends every token the registry client got with it (the epoch).

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use super::auth::{canonical_host, Credential};
use crate::reference::ImageRef;

/// The pull secrets of one node; cheap to clone, clones share the table.
#[derive(Clone, Default)]
pub struct PullSecrets {
    table: Arc<Mutex<Table>>,
}

#[derive(Default)]
struct Table {
    /// By image reference ([`image_key`]).
    by_image: HashMap<String, Recorded>,
    /// Who records here, for an error that found nothing (`None`: nobody does).
    feeder: Option<String>,
    /// Counts recordings, so that the latest one of a repository wins.
    recorded: u64,
    /// Moves on whenever a credential is withdrawn or replaced.
    epoch: u64,
}

struct Recorded {
    host: String,
    repository: String,
    credential: Credential,
    order: u64,
}

/// What [`PullSecrets::record`] replaced, to be put back if the pull it was for fails.
#[must_use]
pub struct Replaced {
    image: String,
    before: Option<Credential>,
    recorded: Credential,
}

/// A pull secret found for a request, and the epoch it was current in: what is built from it
/// (a token) lasts while the epoch does.
pub struct Found {
    pub credential: Credential,
    pub epoch: u64,
}

impl PullSecrets {
    /// Says who records the secrets (the CRI proxy at its socket), for the error of a request
    /// that found none.
    pub fn fed_by(&self, feeder: String) {
        self.table.lock().feeder = Some(feeder);
    }

    /// Records `credential` for `image`, replacing what an earlier pull of it recorded.
    pub fn record(&self, image: &ImageRef, credential: Credential) -> Replaced {
        let key = image_key(image);
        let mut table = self.table.lock();
        table.recorded += 1;
        let order = table.recorded;
        let before = table.by_image.insert(
            key.clone(),
            Recorded {
                host: canonical_host(image.host()),
                repository: image.repository_name().to_owned(),
                credential: credential.clone(),
                order,
            },
        );
        let before = before.map(|recorded| recorded.credential);
        if before.as_ref().is_some_and(|old| *old != credential) {
            table.epoch += 1;
        }
        Replaced {
            image: key,
            before,
            recorded: credential,
        }
    }

    /// Puts back what `replaced` replaced (the pull failed: its credential may be wrong),
    /// unless another pull recorded something else meanwhile.
    pub fn restore(&self, replaced: Replaced) {
        let mut table = self.table.lock();
        let Some(current) = table.by_image.get_mut(&replaced.image) else {
            return;
        };
        if current.credential != replaced.recorded {
            return;
        }
        match replaced.before {
            Some(before) if before == replaced.recorded => {}
            Some(before) => {
                current.credential = before;
                table.epoch += 1;
            }
            None => {
                table.by_image.remove(&replaced.image);
                table.epoch += 1;
            }
        }
    }

    /// Forgets the credential of `image` (it was removed); whether there was one.
    pub fn forget(&self, image: &ImageRef) -> bool {
        let mut table = self.table.lock();
        let forgotten = table.by_image.remove(&image_key(image)).is_some();
        if forgotten {
            table.epoch += 1;
        }
        forgotten
    }

    /// The credential of the latest pull of `repository` on `host`, if any.
    pub fn find(&self, host: &str, repository: &str) -> Option<Found> {
        let host = canonical_host(host);
        let table = self.table.lock();
        table
            .by_image
            .values()
            .filter(|recorded| recorded.host == host && recorded.repository == repository)
            .max_by_key(|recorded| recorded.order)
            .map(|recorded| Found {
                credential: recorded.credential.clone(),
                epoch: table.epoch,
            })
    }

    /// The epoch now: a token built from a pull secret of another epoch is not used.
    pub fn epoch(&self) -> u64 {
        self.table.lock().epoch
    }

    /// The images that have a credential recorded, sorted (references only, no secret).
    pub fn images(&self) -> Vec<String> {
        let mut images: Vec<String> = self.table.lock().by_image.keys().cloned().collect();
        images.sort();
        images
    }

    /// Where a request for `repository` on `host` looked, when the proxy records secrets.
    pub(super) fn looked_in(&self, host: &str, repository: &str) -> Option<String> {
        let table = self.table.lock();
        let feeder = table.feeder.as_ref()?;
        Some(format!(
            "the pull secrets of {feeder} (none for {}/{repository})",
            canonical_host(host)
        ))
    }
}

/// An image as CRI names it in `ImageStatus`: `host/repository:tag` or `host/repository@digest`,
/// Docker Hub's shorthands expanded and `latest` the tag of a bare name.
pub fn image_key(image: &ImageRef) -> String {
    match (image.tag(), image.digest()) {
        (None, None) => format!("{image}:latest"),
        _ => image.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(text: &str) -> ImageRef {
        ImageRef::parse(text).unwrap()
    }

    fn credential(user: &str) -> Credential {
        Credential {
            username: user.to_owned(),
            password: format!("{user}-secret"),
        }
    }

    fn user(secrets: &PullSecrets, host: &str, repository: &str) -> Option<String> {
        secrets
            .find(host, repository)
            .map(|found| found.credential.username)
    }

    #[test]
    fn a_pull_secret_serves_its_repository_until_its_image_is_removed() {
        let secrets = PullSecrets::default();
        let _ = secrets.record(&image("reg.example:5000/team/app:1.0"), credential("a"));
        assert_eq!(
            user(&secrets, "reg.example:5000", "team/app").as_deref(),
            Some("a")
        );
        assert_eq!(user(&secrets, "reg.example:5000", "team/other"), None);
        assert_eq!(user(&secrets, "mirror.example", "team/app"), None);
        // A second image of the repository: the latest pull's credential serves both, and
        // removing one image leaves the other's.
        let _ = secrets.record(&image("reg.example:5000/team/app:2.0"), credential("b"));
        assert_eq!(
            user(&secrets, "reg.example:5000", "team/app").as_deref(),
            Some("b")
        );
        let epoch = secrets.epoch();
        assert!(secrets.forget(&image("reg.example:5000/team/app:2.0")));
        assert!(
            secrets.epoch() > epoch,
            "a withdrawn credential ends its tokens"
        );
        assert_eq!(
            user(&secrets, "reg.example:5000", "team/app").as_deref(),
            Some("a")
        );
        assert!(!secrets.forget(&image("reg.example:5000/team/app:2.0")));
        assert!(secrets.forget(&image("reg.example:5000/team/app:1.0")));
        assert_eq!(user(&secrets, "reg.example:5000", "team/app"), None);
        assert!(secrets.images().is_empty());
    }

    #[test]
    fn docker_hub_is_found_by_its_api_host_and_bare_names_are_latest() {
        let secrets = PullSecrets::default();
        let _ = secrets.record(&image("busybox"), credential("hub"));
        assert_eq!(secrets.images(), ["docker.io/library/busybox:latest"]);
        assert_eq!(
            user(&secrets, "registry-1.docker.io", "library/busybox").as_deref(),
            Some("hub")
        );
        assert!(secrets.forget(&image("docker.io/library/busybox:latest")));
    }

    #[test]
    fn a_failed_pull_puts_back_what_it_replaced() {
        let secrets = PullSecrets::default();
        let app = image("reg.example/app:1");
        let _ = secrets.record(&app, credential("good"));
        let epoch = secrets.epoch();
        let replaced = secrets.record(&app, credential("wrong"));
        assert!(secrets.epoch() > epoch);
        secrets.restore(replaced);
        assert_eq!(
            user(&secrets, "reg.example", "app").as_deref(),
            Some("good")
        );
        // A first pull that fails leaves nothing behind.
        let other = image("reg.example/other:1");
        let replaced = secrets.record(&other, credential("wrong"));
        secrets.restore(replaced);
        assert_eq!(user(&secrets, "reg.example", "other"), None);
        // Another pull recorded meanwhile: its credential stays.
        let replaced = secrets.record(&app, credential("wrong"));
        let _ = secrets.record(&app, credential("newer"));
        secrets.restore(replaced);
        assert_eq!(
            user(&secrets, "reg.example", "app").as_deref(),
            Some("newer")
        );
    }

    #[test]
    fn the_same_credential_again_keeps_the_epoch_and_no_secret_is_shown() {
        let secrets = PullSecrets::default();
        let app = image("reg.example/app:1");
        let _ = secrets.record(&app, credential("a"));
        let epoch = secrets.epoch();
        let _ = secrets.record(&app, credential("a"));
        assert_eq!(secrets.epoch(), epoch);
        assert_eq!(secrets.looked_in("reg.example", "app"), None);
        secrets.fed_by("the CRI proxy at /run/shoal/cri.sock".into());
        let looked = secrets.looked_in("reg.example", "app").unwrap();
        assert!(looked.contains("/run/shoal/cri.sock") && looked.contains("reg.example/app"));
        assert!(!format!("{:?} {:?}", secrets.images(), looked).contains("a-secret"));
    }
}
