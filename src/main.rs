fn main() {
    println!("{:?}", lmspec_engine::runtime::smoke());
}
