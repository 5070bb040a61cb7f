//! Rebuilds the host when a migration is added: `sqlx::migrate!` embeds the
//! folder, but cargo only watches files it knows of.

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
